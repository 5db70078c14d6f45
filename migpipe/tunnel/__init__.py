"""encode and decode as a pipeline: the data plane's threads (dataplane), the Encoder/Decoder and
their I/O edge (pipeline), save --direct's in-place framer (inplace), progress lines (progress).

How work leaves the trio loop, for the whole of migpipe (one rule, three sanctioned forms):

- trio is for control: starting and stopping a job, QMP, the service's sockets, timeouts,
  progress. It never touches a stream's bytes.
- The bytes move in long-lived threads that dataplane starts under a nursery (run_ordered: one
  reader, WORKERS filter threads, one in-order writer; run_interruptible: a single stage), each
  through trio.to_thread with a limiter of its own, so a cancelled task stops them and waits
  for them. A queue bounded to IN_FLIGHT items between them is the backpressure; a buffer
  belongs to the stage that holds it and is handed on, never shared (see io.channel.Source.read).
- A single blocking call that is not a stream (an fdatasync, a publish, waiting for the
  destination's answer) is one trio.to_thread.run_sync; abandon_on_cancel only where nothing
  is closed under the abandoned thread.
- Helper threads that an object owns inside one stage (DirectWriter's disk writer,
  DirectReader's read-ahead, the fixed layout's two sealing threads, a libvirt compressor's
  pump) are started by that object and joined by its close(), within the stage's lifetime.

How a blocked stage is stopped: stopping calls the source channel's interrupt(), which ends a
read that waits for a silent peer (io.channel.Readable: poll beside an eventfd). A write to a
peer that stopped reading is not interrupted; it ends when the peer reads or goes away. The
service, whose jobs must end on cancel-job even then, gives its jobs channels whose every read
and write waits in the job's trio task (service.server.LoopSource, LoopSink) instead.
"""
