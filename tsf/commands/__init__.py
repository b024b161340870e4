"""The ``tsf`` tools beside the LightningCLI subcommands (``sample``, ``finetune``, ``fit``): one module
per command, each with its ``main(argv)`` (the table in :data:`tsf.cli.TOOLS`)."""
