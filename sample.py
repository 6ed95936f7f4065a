"""Write tags for quotes with a LoRA-adapted Llama.

    python sample.py "The only way to do great work is to love what you do. | tags:"
    python sample.py --alpha-sweep 0,0.25,4,16 "Be yourself. | tags:"   # one line per alpha

The adapter comes from train.py's --out folder (default: out/ when it exists) and is merged into
the weights. The decoding loop itself (a KV cache, a token a step) is llama.generate(); this file
chooses each next token: greedy, or sampled with a temperature, top-k and top-p.
--alpha-sweep writes the same prompts at each alpha instead, the adapter kept apart: alpha 0 is
the base, and far past the trained alpha the method's "concussion" shows (the model forgets how
to write).
"""
import sys

import torch

import lora
from data import SEPARATOR
from llama import DEFAULT_MODEL, greedy
from machinery import chat, cli, command, data_files, loading, prompts


# ----------------------------------------------------------------------------- the next token

def sampler(temperature=0.0, top_k=None, top_p=None, generator=None):
    """pick(logits (B, vocab)) -> next tokens (B,), for llama.generate: greedy at temperature 0,
    else a draw from softmax(logits / temperature) among the tokens top-k and top-p leave."""
    if temperature <= 0:
        return greedy

    def pick(logits):
        probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    return pick


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """logits (B, vocab) / temperature, -inf on the tokens top-k and top-p leave out: the rules of
    transformers' Temperature-, TopK- and TopPLogitsWarper, in that order, boundaries included."""
    # Each row's largest logit moved to 0 first: softmax is the same, and a tiny temperature
    # (1e-40) then sends the others to -inf instead of every logit to +-inf and softmax to NaN.
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k:  # every token tied with the k-th stays
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # The smallest set of likeliest tokens whose mass reaches top_p: from the least likely
        # up, a token goes while it and all below it hold at most 1 - top_p. Four equal tokens,
        # top_p 0.5: two go, since the two left already hold 0.5. The likeliest always stays.
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# ----------------------------------------------------------------------------- prompts, tags

def shape_prompts(texts):
    """Each prompt in the shape of the training text, 'quote | tags:'. Without the separator the
    model has no cue to write tags; a space after it is a token training never put there (each
    tag token carries its own leading space), and it changes what the model writes."""
    shaped = [t.rstrip() for t in texts]
    lacking = [i for i, t in enumerate(shaped) if SEPARATOR not in t]
    for i in lacking:
        shaped[i] += SEPARATOR
    if lacking:
        which = f"prompt {lacking[0] + 1}" if len(lacking) == 1 else f"{len(lacking)} prompts"
        print(f'sample.py: note: added "{SEPARATOR}" to {which}: the adapter learned to write '
              f'tags after "<quote>{SEPARATOR}"', file=sys.stderr)
    return shaped


def prompt_ids(tokenizer, texts, form, model_dir):
    """Each prompt's token ids, in the shape the adapter was trained on (form: run.json's
    --format, or chat with --chat): a chat's user turn in the model's own template, ending with
    the assistant's header; an alpaca instruction in alpaca's prompt; a quote or any other
    completion prompt as it is, after bos."""
    if form == "chat":
        template = data_files.chat_template(model_dir)
        names = data_files.special_tokens(tokenizer)
        return [chat.generation_prompt(tokenizer.tokenizer, template,
                                       [{"role": "user", "content": t}], *names) for t in texts]
    if form == "alpaca":
        texts = [data_files.alpaca_prompt(t) for t in texts]
    return [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]  # as training read them


def complete_prompts(model, tokenizer, ids, args, device, dtype):
    """The completions of the prompts (token ids), in their order: llama.generate's loop with
    this file's choice of the next token, seeded by --seed."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pick = sampler(args.temperature, args.top_k, args.top_p, generator)
    return prompts.complete(model, tokenizer, ids, args, device, dtype, pick)


def sweep(model, tokenizer, ids, args, device, dtype):
    """[(alpha, completions of all prompts)] for each --alpha-sweep alpha, in its order. The
    adapter stays apart from W (not merged): set_alpha rescales the same B A in every
    LoraModule."""
    if not lora.lora_modules(model):
        raise ValueError("--alpha-sweep needs an adapter, and none was loaded (pass --adapter)")
    by_alpha = []
    for alpha in args.alpha_sweep:
        lora.set_alpha(model, alpha)
        by_alpha.append((alpha, complete_prompts(model, tokenizer, ids, args, device, dtype)))
    return by_alpha


def write(args):
    """Load the model and its adapter, then write: once, or once per --alpha-sweep alpha.
    Returns (the prompts as shaped, their completions or the sweep's, the prompts' form)."""
    texts = prompts.read_prompts(args)
    adapter = loading.pick(args)  # --adapter, else out/ if train.py wrote it
    # the base and the adapter as they trained (4-bit or not), on --device; --kernels' chapter
    model, tokenizer, device, dtype = loading.model_for(args, adapter, "sample.py")
    form = "chat" if args.chat else loading.trained_format(adapter)  # how it learned to read
    if form == "quotes":
        texts = shape_prompts(texts)  # its note after the loading lines, and only if it loaded
    ids = prompt_ids(tokenizer, texts, form, model.model_dir)
    if args.alpha_sweep:
        return texts, sweep(model, tokenizer, ids, args, device, dtype), form
    # Sampling never changes the adapter: fold alpha * B A into each W once, and every new token
    # costs the base model's products, not two more small ones (and casts) per Linear. Not into
    # a 4-bit W (--quantize): W + alpha * B A is no NF4 matrix, rounding it again would change it.
    if not getattr(model, "quantize", None):  # set by qlora.load on a 4-bit base
        lora.merge_lora(model)
    return texts, complete_prompts(model, tokenizer, ids, args, device, dtype), form


def parse_args(argv=None):
    p = cli.parser("sample.py", __doc__)
    add = p.add_argument
    add("prompts", nargs="*", help='prompts such as "<quote> | tags:" (" | tags:" is added '
        "where missing)")
    add("--chat", action="store_true", help="each prompt a user's turn in the model's chat "
        "template, answered by the assistant (default for an adapter trained on chats)")
    add("--alpha", type=float, default=None,
        help="override the adapter's alpha (try 4 or 16 to watch the 'concussion'; "
        "default: the adapter's)")
    add("--alpha-sweep", type=cli.alphas, default=None, metavar="A,B,...",
        help="write each prompt at each of these alphas, e.g. 0,0.25,1,4,16 (default: once)")
    add("--max-new-tokens", type=cli.positive(int), default=32,
        help="upper bound on generated tokens")
    add("--temperature", type=float, default=0.0, help="0 = greedy")
    add("--top-k", type=cli.positive(int), default=None,
        help="sample among the k likeliest tokens (default: all)")
    add("--top-p", type=float, default=None,
        help="sample within the smallest set of probability >= p (default: 1, all)")
    cli.add_sample_flags(p, DEFAULT_MODEL)  # --adapter, --model, --prompts-file, --device, ...
    return cli.parse_sample(p, argv)


def main(argv=None):
    args = parse_args(argv)
    status, result = command.run_quietly("sample.py", write, args)  # errors: one line, exit 2
    if status is not None:
        return status
    texts, written, form = result
    if args.alpha_sweep:
        prompts.print_sweep(texts, written, args.jsonl)  # a block a prompt, a line an alpha
    else:  # a chat's answer is a turn of its own: on its own line
        prompts.print_completions(texts, written, args.jsonl, "\n" if form == "chat" else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
