-- wrk: one non-streaming chat completion per request (bench/run.py).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"benchmark"}],"max_tokens":16}'
