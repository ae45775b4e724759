from xdl.cli.main import main

main()
