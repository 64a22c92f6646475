"""Components and charts shared by the tabs."""
