"""Command-line tools that exercise the product from the outside (fault campaigns, property checks)."""
