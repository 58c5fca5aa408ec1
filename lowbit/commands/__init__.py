"""One module per `lowbit` subcommand; see lowbit/cli.py."""
