"""Load test of the transcription server: `python -m loadtest` (see loadtest/README.md).

Modules: `workload` (the seeded clip draw), `client` (closed-loop HTTP load), `metrics`
(batching histograms from /metrics), `server` (spawned or external server), `runner`
(configurations × variants × concurrency), `stats` (percentiles, throughput, WER),
`report` (JSON, Markdown, charts), `cli` (the command line and `main(argv)`); `soak`
(`python -m loadtest.soak`: a long mixed run of good clips, bad inputs and disconnects that must stay clean).
"""
