"""Generated gpufed.v1 stubs; regenerate with `make proto`."""
