"""encode and decode as a pipeline: the data plane's threads (dataplane), the Encoder/Decoder and
their I/O edge (pipeline), save --direct's in-place framer (inplace), progress lines
(progress)."""
