from sectune.cli import main

main()
