from gpufed.cli import entrypoint

entrypoint()
