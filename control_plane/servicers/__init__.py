"""The gRPC edge: authorize, parse, call the application, map errors. A few lines a method."""
