"""Channels as atoms: a union-find over every channel a model creates.

Each layer that makes channels (a Dense's units, a convolution's filters, a
model input) creates one atom per channel. A tensor's channel axis is an
array of atoms, one per position: a convolution's output holds its own
atoms, a `Concatenate` the concatenation of its inputs' arrays, a `Flatten`
each channel's atom once per spatial position. Layers that tie channels
together (an `Add` of two branches, a layer called twice on other tensors)
join atoms position by position. After the walk each class of joined atoms
is one channel that can only be removed as a whole, from every tensor that
holds it. An atom that must stay (it reaches a model output, or a layer
surgery cannot follow reads it) is fixed, with the reason.
"""

from __future__ import annotations

import numpy as np


class Atoms:
    """A growing union-find over channel atoms, with producers and fixes."""

    def __init__(self):
        self._parent: list[int] = []
        self.producer: list[str] = []  # the path of the layer that made each atom
        self.fixed: dict[int, str] = {}  # atom -> why it must stay
        self.mixed: dict[int, str] = {}  # atom -> a layer that mixes it with others

    def __len__(self) -> int:
        return len(self._parent)

    def new(self, count: int, producer: str) -> np.ndarray:
        """`count` fresh atoms made by the layer at path `producer`."""
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        self.producer.extend([producer] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def root(self, atom: int) -> int:
        parent = self._parent
        while parent[atom] != atom:
            parent[atom] = parent[parent[atom]]  # path halving
            atom = parent[atom]
        return atom

    def find(self, atoms: np.ndarray) -> np.ndarray:
        """The class (root atom) of each atom."""
        flat = np.asarray(atoms, np.int64).ravel().tolist()
        return np.array([self.root(a) for a in flat], np.int64).reshape(np.shape(atoms))

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie `a[i]` and `b[i]` together, position by position."""
        for x, y in zip(np.asarray(a).tolist(), np.asarray(b).tolist(), strict=True):
            x, y = self.root(x), self.root(y)
            if x != y:
                self._parent[max(x, y)] = min(x, y)

    def fix(self, atoms: np.ndarray, reason: str) -> None:
        """Keep these atoms' classes: `reason` says why (the first one wins)."""
        for atom in np.asarray(atoms, np.int64).tolist():
            self.fixed.setdefault(atom, reason)

    def mix(self, atoms: np.ndarray, layer: str) -> None:
        """These atoms pass a layer that mixes channels (a LayerNormalization)."""
        for atom in np.asarray(atoms, np.int64).tolist():
            self.mixed.setdefault(atom, layer)

    def classes(self) -> dict[int, list[int]]:
        """Each class's root and its atoms."""
        roots = self.find(np.arange(len(self._parent), dtype=np.int64))
        out: dict[int, list[int]] = {}
        for atom, root in enumerate(roots.tolist()):
            out.setdefault(root, []).append(atom)
        return out

    def class_reasons(self, table: dict[int, str]) -> dict[int, str]:
        """`table` (fixed or mixed) lifted from atoms to their classes."""
        out: dict[int, str] = {}
        if not table:
            return out
        atoms = np.fromiter(table, np.int64)
        for atom, root in zip(atoms.tolist(), self.find(atoms).tolist(), strict=True):
            out.setdefault(root, table[atom])
        return out
