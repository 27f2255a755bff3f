"""One module per adapter method."""
