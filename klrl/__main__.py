from klrl.cli import main

main()
