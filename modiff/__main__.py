from modiff.cli import main

main()
