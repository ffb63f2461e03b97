"""Code shared by the site client and the aggregation server."""
