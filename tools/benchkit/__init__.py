"""The pieces of tools/bench.py: processes and CPU meters (procs), the servers under test and their
channel clients (servers), the direct ZeroMQ baseline (direct), pure statistics (stats), the workloads
(workloads), the multi-process load generator (loadgen) and the printed report (report)."""
