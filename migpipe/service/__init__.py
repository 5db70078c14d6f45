"""migpipe serve: its sans-IO protocol (protocol), the server (server) and the client library
daemons use (client). Specified in migpipe-serve(1)."""
