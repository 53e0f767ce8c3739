"""One module per `metaproxy` subcommand: each has NAME, HELP, configure(parser), run(args)."""
