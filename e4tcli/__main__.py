from e4tcli.cli import main

main()
