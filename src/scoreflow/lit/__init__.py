"""Lightning glue: the only package of scoreflow that imports Lightning."""
