# gunicorn settings for tests/apps/gunicorn_app.py: one gevent worker that ends its kernels on exit.
worker_class = "gevent"
workers = 1
graceful_timeout = 5
control_socket_disable = True  # (gunicorn 27 would otherwise make ~/.gunicorn/gunicorn.ctl)


def worker_exit(server, worker):
    """The worker is stopping: end every kernel of its supervisor (kernels first, bounded)."""
    from gunicorn_app import kernels
    kernels.shutdown()
