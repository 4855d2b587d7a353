"""The online loop: the precision ladder (weights for every scheme), the plan swap, the re-planning controller."""
