from migpipe.cli import run

run()
