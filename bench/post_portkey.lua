-- wrk: the same chat completion as post.lua, through Portkey's gateway to the bench's upstream (bench/run.py).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench"
wrk.headers["x-portkey-provider"] = "openai"
wrk.headers["x-portkey-custom-host"] = "http://127.0.0.1:18080/v1"
wrk.body = '{"model":"bench-model","messages":[{"role":"user","content":"benchmark"}],"max_tokens":16}'
