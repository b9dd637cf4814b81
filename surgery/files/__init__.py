"""Files: models and weights in and out, legacy formats, statistics files, atomic writes, row stores."""
