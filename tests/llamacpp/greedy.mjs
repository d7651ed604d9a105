// Greedy decoding in llama.cpp itself (node-llama-cpp's prebuilt CPU build), for tests/test_llamacpp.py and
// `speed_optimizations_2025.py decode --llamacpp`.
// Install: cd tests/llamacpp && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install
//
//   node tests/llamacpp/greedy.mjs --model=out.gguf --prompt="Once upon a time" --new_tokens=20 --threads=2
//   node tests/llamacpp/greedy.mjs --model=out.gguf --stdin   # JSON requests, one a line: {"ids": [1, 2]}
//
// Each request prints one JSON line: {"prompt_ids": [...], "new_ids": [...], "seconds": s, "add_bos": b, "add_eos": b}.
// prompt_ids are what llama.cpp feeds the model: BOS when the GGUF's add_bos_token asks for it, the text tokenized
// with special tokens parsed (as llama-cli does), and EOS when add_eos_token asks for it; "ids" (--ids=1,2,3) feeds
// token ids as given instead. With "follow" the i-th token fed back is follow[i] instead of llama.cpp's pick
// (teacher forcing), so new_ids are llama.cpp's argmax at every position of that path. End tokens do not stop
// decoding. seconds covers the prompt and every new token.
import { createInterface } from "node:readline";
import { parseArgs } from "node:util";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const { values: args } = parseArgs({
    options: {
        model: { type: "string" },
        prompt: { type: "string" },
        ids: { type: "string" }, // comma-separated token ids
        follow: { type: "string" }, // comma-separated token ids to feed back instead of llama.cpp's picks
        new_tokens: { type: "string", default: "16" },
        threads: { type: "string", default: "1" },
        kv_type: { type: "string", default: "F32" }, // F32 keeps attention exact; llama.cpp's default is F16
        stdin: { type: "boolean", default: false }, // read requests from stdin, one JSON object per line
    },
});
if (!args.model || (!args.stdin && (args.prompt === undefined) === (args.ids === undefined)))
    throw new Error("usage: greedy.mjs --model=FILE.gguf (--prompt=TEXT | --ids=1,2,3 | --stdin) [--new_tokens=N]");
const threads = Number(args.threads);
const idList = (text) => (text === undefined ? undefined : text.split(",").map(Number));

// CPU only, and never a download or a build: what node-llama-cpp ships is what runs.
const llama = await getLlama({ gpu: false, build: "never", progressLogs: false, maxThreads: threads,
                               logLevel: LlamaLogLevel.error });
const model = await llama.loadModel({ modelPath: args.model, gpuLayers: 0 });
const tokens = model.tokens;

async function decode({ prompt, ids, follow, new_tokens: newTokens = 16 }) {
    const promptIds = ids ?? [...(tokens.shouldPrependBosToken ? [tokens.bos] : []), ...model.tokenize(prompt, true),
                              ...(tokens.shouldAppendEosToken ? [tokens.eos] : [])];
    const context = await model.createContext({
        contextSize: promptIds.length + newTokens + 1, batchSize: Math.max(promptIds.length, 1), threads,
        flashAttention: false, experimentalKvCacheKeyType: args.kv_type, experimentalKvCacheValueType: args.kv_type,
    });
    const start = performance.now();
    // temperature 0 is argmax, with no other sampler (no repetition penalty).
    const steps = context.getSequence().evaluate(promptIds, { temperature: 0, yieldEogToken: true });
    const newIds = [];
    let fed;
    while (newIds.length < newTokens) {
        const { value, done } = await steps.next(fed);
        if (done) break;
        newIds.push(value);
        fed = follow?.[newIds.length - 1];
    }
    await steps.return();
    const seconds = (performance.now() - start) / 1000;
    await context.dispose();
    return { prompt_ids: promptIds, new_ids: newIds, seconds, add_bos: tokens.shouldPrependBosToken,
             add_eos: tokens.shouldAppendEosToken };
}

if (args.stdin) {
    for await (const line of createInterface({ input: process.stdin }))
        if (line.trim()) console.log(JSON.stringify(await decode(JSON.parse(line))));
} else {
    console.log(JSON.stringify(await decode({ prompt: args.prompt, ids: idList(args.ids), follow: idList(args.follow),
                                              new_tokens: Number(args.new_tokens) })));
}
await model.dispose();
await llama.dispose();
