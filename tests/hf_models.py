"""Tiny Hugging Face model directories for the interop tests, made offline: a byte-level BPE trained with the
`tokenizers` library in each family's style (pre-tokenizer chain, special tokens, chat template) and a randomly
initialised transformers model written with save_pretrained."""

import json
import random

import torch

# The pre-tokenizer regexes of Qwen2 (Split, isolated) and Llama 3, as their tokenizer.json files hold them.
QWEN_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
            r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
LLAMA3_PAT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# The chat templates the models ship (Qwen2.5-Instruct and Qwen3 without their tool-call branches, SmolLM2-Instruct,
# Meta-Llama-3-Instruct), and a Mistral-style one that ends the reply with the end-of-sequence token and has no
# generation prompt.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501 (the template's own lines)

QWEN3_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for index in range(ns.last_query_index, -1, -1) %}
    {%- set message = messages[index] %}
    {%- if ns.multi_step_tool and message.role == "user" and not('<tool_response>' in message.content and '</tool_response>' in message.content) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                    "{% endif %}")
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 "
                    "== 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}"
                    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
                    "{% endfor %}")

# style: (pre-tokenizer, special tokens (first = before the BPE ids), non-special added tokens,
#         bos, eos, pad, chat template)
STYLES = {
    "gpt2": dict(specials=["<|endoftext|>"], specials_first=False, bos="<|endoftext|>", eos="<|endoftext|>"),
    "smollm2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<file_sep>"],
                    specials_first=True, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>",
                    template=SMOLLM2_TEMPLATE),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>"], specials_first=False, bos="<|begin_of_text|>", eos="<|eot_id|>",
                   template=LLAMA3_TEMPLATE, ignore_merges=True),
    "qwen": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<tool_call>", "</tool_call>"],
                 specials_first=False, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN25_TEMPLATE),
    "qwen3": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<think>", "</think>"],
                  specials_first=False, eos="<|im_end|>", pad="<|endoftext|>", template=QWEN3_TEMPLATE),
    "mistral": dict(specials=["<unk>", "<s>", "</s>"], specials_first=True, bos="<s>", eos="</s>",
                    template=MISTRAL_TEMPLATE, shuffle=True),
}

ENGLISH = "The quick brown fox doesn't jump; it's 1234567 times lazier, isn't it? I'LL see. They've 3.14%!"
CHINESE = "我们的模型在训练数据上表现很好，但是需要更多的中文语料。"
EMOJI = "😀🎉 🚀❤️ 👍🏽 🇫🇷 e\u0301 café"
CODE = "def f(x):\n    return x**2  # square\n\n\tif a != b: print(\"ok\")\r\n    {'k': [1, 2]}  "
TEXTS = [ENGLISH, CHINESE, EMOJI, CODE, "", " ", "\n\n", "  x  ", "2024年12月31日", "a<|im_end|>b<|endoftext|>",
         "<tool_call>{\"a\": 1}</tool_call>", "<s>[INST] hi [/INST]</s>"]


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    """Mixed English, Chinese, emoji, numbers and code, with frequent repeats so that merges form."""
    rng = random.Random(seed)
    words = ("the model learn data token quick brown fox it's don't they've 模型 训练 数据 中文 语料 😀 🎉 👍 "
             "def return print self if else 2024 31415 1000000 == != -> ( ) { } [ ] : ; , . \" '").split()
    spaces = [" ", " ", " ", "  ", "\n", "\n    ", "\t", "\r\n"]
    return ["".join(rng.choice(words) + rng.choice(spaces) for _ in range(rng.randint(5, 30))) for _ in range(n)]


def fuzz_texts(n: int, seed: int = 1) -> list[str]:
    """Random mixtures of the pieces that split differently under different pre-tokenizers."""
    rng = random.Random(seed)
    pieces = [*"aZé中文😀 \t\n\r'sdltvemR0123456789.,!?-_<|>(=", "\u00a0", "\u3000", "\u0301", "ß", "e\u0301",
              "the", " model", "训练", "    ", "2024", "'ll", "<|im_end|>", "<|endoftext|>", "<tool_call>", "<s>",
              "👍🏽", "\r\n", "def "]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def build_tokenizer(style: str, vocab_size: int = 700):
    """A tokenizers.Tokenizer trained in the family's style (and its settings for the transformers wrapper)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    spec = STYLES[style]
    tok = Tokenizer(models.BPE(ignore_merges=spec.get("ignore_merges", False)))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "smollm2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        pattern = LLAMA3_PAT if style in ("llama3", "mistral") else QWEN_PAT
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"), byte_level])
    if style.startswith("qwen"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    first = spec["specials"] if spec["specials_first"] else []
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, show_progress=False, special_tokens=first,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if spec.get("shuffle"):  # ids out of merge order (the BPE still merges by the merges' order)
        data = json.loads(tok.to_str())
        vocab = data["model"]["vocab"]
        ids = sorted(i for t, i in vocab.items() if t not in first)
        rng = random.Random(0)
        shuffled = ids[:]
        rng.shuffle(shuffled)
        remap = dict(zip(ids, shuffled))
        data["model"]["vocab"] = {t: remap.get(i, i) for t, i in vocab.items()}
        tok = Tokenizer.from_str(json.dumps(data))
    tok.add_special_tokens([t for t in spec["specials"] if t not in first])
    tok.add_tokens(spec.get("plain", []))
    return tok


def save_tokenizer(style: str, directory, tok=None, template_in_config: bool = False):
    """tokenizer.json, tokenizer_config.json and (as transformers 5 writes it) chat_template.jinja."""
    import transformers

    spec = STYLES[style]
    tok = tok or build_tokenizer(style)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec.get("bos"),
                                                eos_token=spec["eos"], pad_token=spec.get("pad"))
    fast.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if spec.get("template"):
        if template_in_config:  # the older layout: the template inside tokenizer_config.json
            config["chat_template"] = spec["template"]
        else:
            (directory / "chat_template.jinja").write_text(spec["template"])
    config_path.write_text(json.dumps(config))
    return tok


# family: (transformers config class, its arguments, tokenizer style)
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=128), "gpt2"),
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                                  rope_theta=10000.0), "smollm2"),
    "llama3": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                                   attention_bias=True, mlp_bias=True, rope_theta=500000.0, rope_scaling=dict(
                                       rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)), "llama3"),
    "llama_linear": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                         rope_theta=10000.0, rope_scaling=dict(rope_type="linear", factor=4.0)),
                     "llama3"),
    "mistral": ("MistralConfig", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, sliding_window=40, rope_theta=10000.0), "mistral"),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                                  rope_theta=1000000.0), "qwen"),
    "qwen3": ("Qwen3Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                  tie_word_embeddings=False, rope_theta=1000000.0), "qwen3"),
}


def build_model(family: str, vocab_size: int, seed: int = 0):
    """A random transformers model of the family, every weight (norms and biases too) away from its init value
    so that a swapped or missing tensor shows in the logits."""
    import transformers

    config_class, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(vocab_size=vocab_size, bos_token_id=None, eos_token_id=None, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def make_model_dir(family: str, directory, extra_vocab: int = 0, template_in_config: bool = False):
    """A HF model directory: the family's tokenizer and a model with its vocabulary (plus extra_vocab unused rows,
    as Qwen's configs have); returns the transformers model."""
    tok = build_tokenizer(FAMILIES[family][2])
    save_tokenizer(FAMILIES[family][2], directory, tok, template_in_config)
    model = build_model(family, tok.get_vocab_size() + extra_vocab)
    model.save_pretrained(directory)
    return model
