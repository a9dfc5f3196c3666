from qmargin.cli import main

main()
