from node_daemon.main import main

main()
