"""Node implementations for examples/hello.json.

    flowcraft run examples/hello.json --registry examples/hello.py:registry --context '{"name": "Ada"}'
"""


async def greet(ctx):
    return f"Hello, {ctx.input or 'world'}!"


async def shout(ctx):
    return ctx.input.upper()


async def whisper(ctx):
    return ctx.input.lower()


def sign(ctx):
    # A plain def runs in a thread; it reaches the context through ctx.context.sync.
    (message,) = ctx.input.values()
    ctx.context.sync.set("signed", True)
    return f"{message} -- flowcraft"


registry = {
    "hello.greet": greet,
    "hello.shout": shout,
    "hello.whisper": whisper,
    "hello.sign": sign,
}
