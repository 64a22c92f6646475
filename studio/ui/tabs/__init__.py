"""One module per tab: it builds the tab's components and holds its handlers as plain functions."""
