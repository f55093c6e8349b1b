"""Agent frameworks' tool loops, unmodified, over an upstream like llama-cpp-python's server (chat completions
only, null content refused, late system turns refused, streamed tool calls answered with an empty stream): the
OpenAI Agents SDK (Responses and chat models), the anthropic SDK, and LangChain's ChatAnthropic and ChatOpenAI,
each calling a function tool and answering with its result."""

from __future__ import annotations

import asyncio

import anthropic
import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

MODEL = "qwen2.5-7b-instruct"
ECHO = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}


@pytest.fixture
def llama(fake, start_gateway):
    return start_gateway({"INFERENCE_INFERENCE_BASE_URL": fake.like_llama_cpp_python().url,
                          "INFERENCE_INFERENCE_HTTP_TIMEOUT_SECS": "5"})


def lookups(fake) -> list[str]:
    """The tool results the upstream was sent back (the loop's second turn)."""
    return [m["content"] for r in fake.received if r.path == "/v1/chat/completions"
            for m in r.body["messages"] if m["role"] == "tool"]


@pytest.mark.parametrize("api", ["responses", "chat"])
@pytest_twisted.ensureDeferred
async def test_the_agents_sdk_runs_a_tool_loop(fake, llama, api):
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # the SDK's own traces go to OpenAI

    @function_tool
    def look_up(echo: str) -> str:
        """Look a thing up."""
        return f"found {echo}"

    def run() -> str:
        async def main() -> str:
            client = AsyncOpenAI(base_url=llama.url + "/v1", api_key="unused", max_retries=0)
            model = OpenAIResponsesModel(MODEL, client) if api == "responses" else \
                OpenAIChatCompletionsModel(MODEL, client)
            agent = Agent(name="helper", instructions="Use your tool.", model=model, tools=[look_up])
            result = await Runner.run(agent, "the weather in Paris")
            await client.close()
            return str(result.final_output)
        return asyncio.run(main())

    final = await deferToThread(run)
    assert final == "echo: found the weather in Paris"
    assert lookups(fake) == ["found the weather in Paris"]


@pytest.mark.parametrize("stream", [False, True])
@pytest_twisted.ensureDeferred
async def test_the_anthropic_sdk_runs_a_tool_loop(fake, llama, stream):
    def run() -> tuple[str, str]:
        client = anthropic.Anthropic(base_url=llama.url, api_key="unused", max_retries=0)
        tools = [{"name": "look_up", "description": "Look a thing up.", "input_schema": ECHO}]
        messages: list = [{"role": "user", "content": "the weather in Paris"}]
        stops = []
        for _ in range(2):
            if stream:
                with client.messages.stream(model=MODEL, max_tokens=100, tools=tools, messages=messages) as s:
                    answer = s.get_final_message()
            else:
                answer = client.messages.create(model=MODEL, max_tokens=100, tools=tools, messages=messages)
            stops.append(answer.stop_reason)
            messages.append({"role": "assistant", "content": [b.model_dump() for b in answer.content]})
            used = [b for b in answer.content if b.type == "tool_use"]
            if not used:
                return answer.content[0].text, ",".join(stops)
            messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": used[0].id,
                                                          "content": f"found {used[0].input['echo']}"}]})
        raise AssertionError("the loop did not end")

    text, stops = await deferToThread(run)
    assert text == "echo: found the weather in Paris" and stops == "tool_use,end_turn"


@pytest.mark.parametrize("flavour", ["anthropic", "openai"])
@pytest_twisted.ensureDeferred
async def test_langchain_bind_tools_round_trip(fake, llama, flavour):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def look_up(echo: str) -> str:
        """Look a thing up."""
        return f"found {echo}"

    def run() -> str:
        if flavour == "anthropic":
            from langchain_anthropic import ChatAnthropic
            chat = ChatAnthropic(model=MODEL, base_url=llama.url, api_key="unused", max_retries=0, max_tokens=100)
        else:
            from langchain_openai import ChatOpenAI
            chat = ChatOpenAI(model=MODEL, base_url=llama.url + "/v1", api_key="unused", max_retries=0)
        bound = chat.bind_tools([look_up])
        messages: list = [HumanMessage("the weather in Paris")]
        first = bound.invoke(messages)
        (called,) = first.tool_calls
        messages += [first, ToolMessage(look_up.invoke(called["args"]), tool_call_id=called["id"])]
        return str(bound.invoke(messages).text)

    assert await deferToThread(run) == "echo: found the weather in Paris"
    assert lookups(fake) == ["found the weather in Paris"]
