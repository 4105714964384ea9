"""The `item` command line (`worker.cli.main`): shared pieces in `common`, one module per command group."""
