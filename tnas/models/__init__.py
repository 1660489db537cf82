"""Networks: the DARTS supernet (search) and the derived network of a genotype."""
