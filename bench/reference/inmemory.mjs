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

// The small-run shapes, the same as build_small_blueprint in bench/inmemory.py.
function buildSmallBlueprint(shape) {
	const nodes = []
	const edges = []
	if (shape === 'diamond') {
		for (let i = 0; i < 5; i++) nodes.push({ id: `n${i}`, uses: 'step' })
		for (const i of [1, 2, 3]) edges.push({ source: 'n0', target: `n${i}` })
		for (const i of [1, 2, 3]) edges.push({ source: `n${i}`, target: 'n4' })
	} else if (shape === 'gate20') {
		for (let i = 0; i < 19; i++) nodes.push({ id: `n${i}`, uses: 'step' })
		nodes.push({ id: 'n19', uses: 'step', config: { joinStrategy: 'any' } })
		for (let i = 1; i < 7; i++) edges.push({ source: 'n0', target: `n${i}` })
		for (let i = 1; i < 7; i++) edges.push({ source: `n${i}`, target: 'n7' })
		edges.push({ source: 'n7', target: 'n8', condition: 'result.output' })
		edges.push({ source: 'n7', target: 'n14', condition: 'result.missing' })
		for (let i = 8; i < 13; i++) edges.push({ source: `n${i}`, target: `n${i + 1}` })
		for (let i = 14; i < 18; i++) edges.push({ source: `n${i}`, target: `n${i + 1}` })
		edges.push({ source: 'n13', target: 'n19' })
		edges.push({ source: 'n18', target: 'n19' })
	} else {
		throw new Error(`unknown small shape '${shape}'`)
	}
	return { id: `bench-${shape}`, nodes, edges }
}

// `runs` runs one after another, then `runs` started at once; CPU seconds of this process.
// Checked: status completed and a numeric sink output (the reference's joins hand over a
// single input, so the value itself differs from Python's).
async function small(shape, runs) {
	const blueprint = buildSmallBlueprint(shape)
	const runtime = new FlowRuntime({ registry: { step }, logger: new NullLogger() })
	const sink = `n${blueprint.nodes.length - 1}`
	const problems = []
	const check = (result) => {
		const out = result.context?.[`_outputs.${sink}`]
		if (result.status !== 'completed' || typeof out !== 'number') {
			problems.push(`status ${result.status}, sink ${out}`)
		}
	}
	for (let i = 0; i < 20; i++) check(await runtime.run(blueprint, {}))
	const cpu = () => {
		const u = process.cpuUsage()
		return (u.user + u.system) / 1e6
	}
	const record = { shape, runs }
	let c = cpu()
	let w = performance.now()
	for (let i = 0; i < runs; i++) check(await runtime.run(blueprint, {}))
	record.sequentialCpu = cpu() - c
	record.sequentialWall = (performance.now() - w) / 1000
	c = cpu()
	w = performance.now()
	const all = []
	for (let i = 0; i < runs; i++) all.push(runtime.run(blueprint, {}))
	for (const result of await Promise.all(all)) check(result)
	record.concurrentCpu = cpu() - c
	record.concurrentWall = (performance.now() - w) / 1000
	record.ok = problems.length === 0
	if (problems.length) record.error = `${problems.length} bad runs, first: ${problems[0]}`
	emit(record)
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
	if (process.argv[2] === 'small') {
		await small(process.argv[3], Number.parseInt(process.argv[4], 10))
		return
	}
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
