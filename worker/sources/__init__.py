"""Where a check's image is read from: inline bytes, files, URLs, S3."""
