import os
import subprocess
import sys

from surgery.runtime.quiet import _without_noise

TF_IMPORT_NOISE = (
    "WARNING: All log messages before absl::InitializeLog() is called are "
    "written to STDERR\n"
    "I0000 00:00:1796156449.033699    5229 port.cc:153] oneDNN custom operations "
    "are on. You may see slightly different numerical results\n"
    "W0000 00:00:1796156449.1    5229 cpu_feature_guard.cc:227] This binary\n"
    "To enable the following instructions: AVX2 FMA\n"
)


def test_absl_info_and_warning_records_are_dropped_errors_and_text_kept():
    error = "E0000 00:00:1796156449.2    5229 x.cc:1] real failure\ndetail\n"
    assert _without_noise(TF_IMPORT_NOISE) == ""
    assert _without_noise(TF_IMPORT_NOISE + error) == error
    assert _without_noise("plain text\n" + TF_IMPORT_NOISE) == "plain text\n"


def test_the_cli_leaves_stderr_empty_with_onednn_on_and_off():
    for onednn in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
        env["TF_ENABLE_ONEDNN_OPTS"] = onednn
        done = subprocess.run(
            [sys.executable, "-m", "surgery", "inspect"],
            capture_output=True, text=True, check=False, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "fc2" in done.stdout
        assert done.stderr == "", (onednn, done.stderr)
