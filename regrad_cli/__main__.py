from regrad_cli.cli import main

main()
