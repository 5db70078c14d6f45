"""migpipe's own filters, registered under the `migpipe.filters` entry-point group."""
