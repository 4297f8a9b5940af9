"""Sweep jobs: a queue shared by every server on one store, one job at a time per server, each step on the
engine thread.

- :class:`~server.store.jobs.JobStore` keeps jobs and their finished rows (one row per step key, written as
  each step finishes), with leases: a server claims a job with one conditional ``UPDATE``, renews its
  heartbeat every ``job_lease_s / 3`` while it runs it, and another server takes the job over only once that
  heartbeat is older than ``job_lease_s`` (its owner died). A resumed job reruns no finished step.
- :class:`JobManager` owns one background worker (tracked in a set with the heartbeat and SSE helpers and
  cancelled on shutdown, which gives the running job back so any server resumes it at once). For each job it
  builds a :class:`~laser_ops.sweeps.SweepRunner` off the event loop, then submits every step as its own
  engine task, so inference batches run between sweep steps. Progress is fanned out to SSE subscribers (a
  subscriber on another server follows the store) and to the ``laser_jobs`` / ``laser_job_progress_ratio``
  gauges.
- Cancel is a state change in the store, from any server: the owner sees it at its next heartbeat or step
  (a step already on the engine finishes; only rows stored before the cancel are kept).
- A job is bound to the fingerprint of the model it was submitted for; a server with other weights fails
  it instead of resuming it with a different base row.

Modules: :mod:`.manager` (the worker, leases, progress fan-out), :mod:`.views` (records as protocol models),
:mod:`.service` (what the job routes do: create, read, cancel, delete, follow) and :mod:`.results` (what a
finished job offers: per-example evidence, the heatmap, promotion to a profile).
"""
