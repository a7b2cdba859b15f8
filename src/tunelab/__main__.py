from tunelab.cli.app import main

main()
