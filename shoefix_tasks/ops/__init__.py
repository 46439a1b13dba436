"""What operators and triggers touch: the `shoefix` CLI, the ShoeFix page's data, trigger rules."""
