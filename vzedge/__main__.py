from vzedge.cli import main

main()
