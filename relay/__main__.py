from relay.entry import main

main()
