"""Training-loop pieces shared by every recipe."""
