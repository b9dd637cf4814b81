"""Files: models and weights in and out, legacy formats, statistics files, fingerprints, atomic writes, row stores."""
