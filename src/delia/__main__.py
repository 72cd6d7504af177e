from delia.cli import main

main()
