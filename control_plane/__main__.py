from control_plane.main import main

main()
