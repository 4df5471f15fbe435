// One benchmark case against the TypeScript reference (npm `flowcraft`, pinned in package.json).
//
//   node --max-old-space-size=8192 bench/reference/inmemory.mjs <chain|fan> <N>
//
// Prints one JSON line on stdout: {"ok", "shape", "n", "seconds", "status", "error"?}.
// Only `runtime.run` is timed. Peak RSS is measured by the parent (bench/inmemory.py) from
// this process's rusage; `rssAfter`/`maxRssSelf` here are informational.
// bench/inmemory.py is the driver; run this directly only to debug one case.

import { FlowRuntime, NullLogger } from 'flowcraft'

// The same blueprint shapes as bench/inmemory.py (camelCase JSON, ids n0..n(N-1)).
function buildBlueprint(shape, n) {
	const nodes = []
	for (let i = 0; i < n; i++) nodes.push({ id: `n${i}`, uses: 'step' })
	const edges = []
	if (shape === 'chain') {
		for (let i = 0; i < n - 1; i++) edges.push({ source: `n${i}`, target: `n${i + 1}` })
	} else if (shape === 'fan') {
		const sink = `n${n - 1}`
		for (let i = 1; i < n - 1; i++) edges.push({ source: 'n0', target: `n${i}` })
		for (let i = 1; i < n - 1; i++) edges.push({ source: `n${i}`, target: sink })
	} else {
		throw new Error(`unknown shape '${shape}'`)
	}
	return { id: `bench-${shape}-${n}`, nodes, edges }
}

// input + 1; a join that hands over a mapping gets the sum of its values.
async function step(ctx) {
	const x = ctx.input
	if (x !== null && typeof x === 'object') {
		let sum = 0
		for (const v of Object.values(x)) sum += v
		return { output: sum }
	}
	return { output: (x ?? 0) + 1 }
}

function emit(record) {
	process.stdout.write(`${JSON.stringify(record)}\n`)
}

async function main() {
	const [shape, nText] = process.argv.slice(2)
	const n = Number.parseInt(nText, 10)
	if (!shape || !(n >= 3)) {
		console.error('usage: inmemory.mjs <chain|fan> <N>=3>')
		process.exit(2)
	}
	const blueprint = buildBlueprint(shape, n)
	const runtime = new FlowRuntime({ registry: { step }, logger: new NullLogger() })
	const sink = `n${n - 1}`

	const started = performance.now()
	const result = await runtime.run(blueprint, {})
	const seconds = (performance.now() - started) / 1000

	const context = result.context ?? {}
	let outputs = 0
	for (const key of Object.keys(context)) if (key.startsWith('_outputs.')) outputs++
	const sinkOutput = context[`_outputs.${sink}`]
	const problems = []
	if (result.status !== 'completed') problems.push(`status is '${result.status}'`)
	if (typeof sinkOutput !== 'number') problems.push(`no numeric output for sink ${sink}`)
	// In a chain every node adds 1, so the sink's output is N. In the fan the reference hands
	// the sink one predecessor's output (not a mapping), so only its presence is checked.
	if (shape === 'chain' && sinkOutput !== n) problems.push(`sink output ${sinkOutput} != ${n}`)
	if (outputs !== n) problems.push(`${outputs} node outputs, expected ${n}`)
	if (result.errors?.length) problems.push(`errors: ${result.errors[0].message ?? result.errors[0]}`)

	emit({
		ok: problems.length === 0,
		shape,
		n,
		seconds,
		status: result.status,
		sinkOutput,
		rssAfter: process.memoryUsage().rss,
		maxRssSelf: process.resourceUsage().maxRSS * 1024,
		...(problems.length ? { error: problems.join('; ') } : {}),
	})
}

main().catch((error) => {
	emit({ ok: false, error: String(error?.stack ?? error) })
	process.exit(1)
})
