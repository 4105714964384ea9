"""Migration scripts, one revision per file (a package so that installs ship them)."""
