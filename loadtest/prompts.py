"""Prompts for the Locust scenarios: realistic English and Chinese questions.

Four kinds of request, chosen by the load mix (loadtest/locustfile.py):

- fresh: a question composed from a template, a topic and a detail; thousands of distinct texts
  (exact-cache misses, and no semantic hits either: the numbers in the detail differ);
- repeat: one of the POPULAR questions, verbatim (exact-cache hits once it has been answered);
- paraphrase: a rewording of a POPULAR question (semantic-cache hits once the original is stored);
- listed: a question that contains an entry of config/words/*.txt (the input policy blocks it).

Pure data and pure functions of a `random.Random`; no I/O except reading the word lists.
"""

from __future__ import annotations

import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (question, paraphrases): the paraphrases ask the same thing in other words, same language.
POPULAR: list[tuple[str, list[str]]] = [
    ("How do I reset my router to factory settings?",
     ["How can I restore my router to its factory settings?", "What's the way to factory reset my router?"]),
    ("What is the difference between a list and a tuple in Python?",
     ["How does a Python list differ from a tuple?", "In Python, what distinguishes a list from a tuple?"]),
    ("How do I reverse a string in JavaScript?",
     ["What's the way to reverse a string in JavaScript?", "In JavaScript, how can I reverse a string?"]),
    ("Why does my sourdough bread come out so dense?",
     ["What makes my sourdough bread turn out dense?"]),
    ("How long should I rest a steak after cooking it?",
     ["How long do I let a steak rest once it is cooked?"]),
    ("What are the main symptoms of dehydration?",
     ["What are the common signs of dehydration?", "How can I tell if I am dehydrated?"]),
    ("How do I write a polite follow-up email after a job interview?",
     ["How should I write a polite follow-up email after a job interview?"]),
    ("What is the best way to learn touch typing?",
     ["What's the most effective way to learn touch typing?"]),
    ("How does compound interest work?",
     ["Can you explain how compound interest works?", "What is compound interest and how does it work?"]),
    ("What is a good stretching routine for lower back pain?",
     ["Which stretches help with lower back pain?"]),
    ("How do I undo the last commit in git?",
     ["How can I undo my last git commit?", "What's the command to undo the last commit in git?"]),
    ("What causes the seasons on Earth?",
     ["Why does Earth have seasons?", "What is the reason Earth has seasons?"]),
    ("How do I keep basil fresh in the kitchen?",
     ["What's the best way to keep basil fresh in the kitchen?"]),
    ("What is the difference between RAM and storage?",
     ["How is RAM different from storage?"]),
    ("How can I improve my public speaking skills?",
     ["What can I do to get better at public speaking?", "How do I become a better public speaker?"]),
    ("What should I pack for a weekend hiking trip?",
     ["What do I need to pack for a weekend hiking trip?"]),
    ("How do vaccines train the immune system?",
     ["How does a vaccine teach the immune system to respond?"]),
    ("What is the difference between latency and throughput?",
     ["How does latency differ from throughput?"]),
    ("How do I center a div with CSS?",
     ["What's the way to center a div using CSS?", "How can I center a div in CSS?"]),
    ("Why do cats knead with their paws?",
     ["Why do cats make kneading motions with their paws?"]),
    ("How do I remove a red wine stain from a carpet?",
     ["How can I get a red wine stain out of a carpet?"]),
    ("What is the difference between a virus and a bacterium?",
     ["How is a virus different from a bacterium?"]),
    ("How do I prepare for a system design interview?",
     ["What's the best way to prepare for a system design interview?"]),
    ("What does a product manager do all day?",
     ["What does a product manager actually do during the day?"]),
    ("How do I make cold brew coffee at home?",
     ["What's the method for making cold brew coffee at home?", "How can I brew cold brew coffee at home?"]),
    ("What is the difference between SQL and NoSQL databases?",
     ["How do SQL databases differ from NoSQL databases?"]),
    ("How can I stop procrastinating?",
     ["What can I do to stop procrastinating?", "How do I overcome procrastination?"]),
    ("What is a healthy breakfast that keeps me full until lunch?",
     ["Which healthy breakfast keeps me full until lunch?"]),
    ("How do I explain recursion to a beginner?",
     ["How would you explain recursion to a beginner?"]),
    ("Why is the ocean salty?",
     ["What makes the ocean salty?", "Why is sea water salty?"]),
    ("如何把路由器恢复出厂设置？",
     ["路由器怎么恢复出厂设置？", "怎样将路由器重置为出厂设置？"]),
    ("Python 里列表和元组有什么区别？",
     ["Python 中列表与元组的区别是什么？", "在 Python 里，列表和元组有哪些不同？"]),
    ("怎么做一碗好吃的番茄炒蛋？",
     ["番茄炒蛋怎么做才好吃？", "好吃的番茄炒蛋应该怎么做？"]),
    ("失眠了应该怎么办？",
     ["睡不着觉该怎么办？", "失眠的时候应该怎么做？"]),
    ("如何提高英语口语水平？",
     ["怎样才能提高英语口语？", "英语口语水平怎么提高？"]),
    ("复利是怎么计算的？",
     ["复利的计算方法是什么？", "怎么计算复利？"]),
    ("怎么写一封得体的求职邮件？",
     ["求职邮件应该怎么写才得体？"]),
    ("为什么天空是蓝色的？",
     ["天空为什么是蓝色？", "天空呈现蓝色的原因是什么？"]),
    ("如何缓解久坐导致的腰痛？",
     ["久坐引起的腰痛怎么缓解？", "长时间坐着腰疼该怎么缓解？"]),
    ("git 怎么撤销最后一次提交？",
     ["怎样撤销 git 的最后一次提交？", "git 如何撤回最近一次提交？"]),
    ("绿茶和红茶有什么区别？",
     ["红茶和绿茶的区别是什么？", "绿茶跟红茶有哪些不同？"]),
    ("怎么养好一盆绿萝？",
     ["绿萝应该怎么养？", "如何把绿萝养好？"]),
    ("孩子不爱吃蔬菜怎么办？",
     ["小孩不喜欢吃蔬菜该怎么办？"]),
    ("如何准备一场技术面试？",
     ["技术面试应该怎么准备？", "怎样准备技术面试？"]),
    ("咖啡喝多了有什么坏处？",
     ["喝太多咖啡有哪些坏处？"]),
    ("什么是机器学习？",
     ["机器学习是什么？", "请解释一下什么是机器学习。"]),
    ("怎么去除衣服上的油渍？",
     ["衣服上的油渍怎么洗掉？", "如何清除衣服上的油渍？"]),
    ("新手怎么开始跑步？",
     ["跑步新手应该怎么开始？"]),
    ("如何提高工作效率？",
     ["怎样才能提高工作效率？", "工作效率怎么提高？"]),
    ("为什么海水是咸的？",
     ["海水为什么是咸的？", "海水发咸的原因是什么？"]),
    ("怎么判断西瓜熟没熟？",
     ["如何挑选成熟的西瓜？"]),
    ("TCP 和 UDP 有什么区别？",
     ["TCP 与 UDP 的区别是什么？", "TCP 跟 UDP 有哪些不同？"]),
    ("感冒了吃什么好得快？",
     ["感冒的时候吃什么恢复得快？"]),
    ("如何学好数学？",
     ["怎样才能学好数学？", "数学应该怎么学？"]),
    ("怎样做一份好的简历？",
     ["好的简历应该怎么写？", "如何写出一份好简历？"]),
    ("猫为什么喜欢踩奶？",
     ["猫咪为什么会踩奶？"]),
    ("怎么煮出粒粒分明的米饭？",
     ["米饭怎么煮才能粒粒分明？"]),
    ("什么是区块链？",
     ["区块链是什么？", "请简单解释一下区块链。"]),
    ("怎么缓解工作压力？",
     ["工作压力大该怎么缓解？", "如何缓解工作上的压力？"]),
    ("如何保护眼睛视力？",
     ["怎样保护视力？", "平时怎么保护眼睛？"]),
]

EN_TEMPLATES = [
    "Explain {topic} to a {audience} in about {n} words.",
    "Give me {n} practical tips about {topic} for a {audience}.",
    "Write a short summary of {topic} for a {audience}, at most {n} sentences.",
    "What are the {n} most common mistakes people make with {topic}?",
    "I'm a {audience}. Can you outline a {n}-week plan to get started with {topic}?",
    "List {n} questions a {audience} should ask before getting into {topic}.",
    "Compare {n} approaches to {topic} and say which suits a {audience} best.",
    "Draft an email to my team of {n} people about {topic}, in a friendly tone.",
    "What would a {audience} need to know about {topic} in {n} bullet points?",
    "Summarize the pros and cons of {topic} in {n} lines for a {audience}.",
    "Write a {n}-step checklist for {topic}.",
    "How would you teach {topic} to a {audience} in {n} minutes?",
    "Suggest {n} good books or resources on {topic} for a {audience}.",
    "Tell me a short story of about {n} words that involves {topic}.",
    "What changed about {topic} in the last {n} years?",
    "Give a {audience} {n} examples that illustrate {topic}.",
    "Plan a {n}-minute meeting agenda about {topic}.",
    "Write {n} quiz questions on {topic} with answers, for a {audience}.",
]

EN_TOPICS = [
    "sourdough baking", "container gardening on a balcony", "personal budgeting", "index funds",
    "marathon training", "home composting", "the basics of machine learning", "Kubernetes autoscaling",
    "Rust ownership and borrowing", "learning Japanese", "remote team management", "writing unit tests",
    "solar panels for homes", "the history of the printing press", "photosynthesis", "time management",
    "healthy meal prep", "public key cryptography", "beekeeping", "bird watching", "the French Revolution",
    "electric cars", "sleep hygiene", "negotiating a salary", "first aid for burns", "wine tasting",
    "climate change adaptation", "urban cycling", "indoor rock climbing", "podcast production",
    "sign language", "chess openings", "database indexing", "the water cycle", "fermenting vegetables",
    "caring for a puppy", "home office ergonomics", "3D printing", "stargazing", "job interview prep",
    "plant-based protein", "renting a first apartment", "open source licensing", "watercolor painting",
    "cloud cost optimization", "REST API design", "memory techniques", "mindfulness meditation",
    "vintage furniture restoration", "supply chain basics",
]

AUDIENCES = [
    "complete beginner", "high school student", "busy parent", "software engineer", "retired teacher",
    "small business owner", "university student", "nurse", "project manager", "ten-year-old",
]

ZH_TEMPLATES = [
    "请用大约{n}个字向{audience}解释{topic}。",
    "给{audience}列出关于{topic}的{n}条实用建议。",
    "{topic}有哪些常见误区？请列出{n}个。",
    "我是{audience}，请帮我制定一个{n}周的{topic}入门计划。",
    "用{n}句话总结一下{topic}的优缺点。",
    "请写一份关于{topic}的{n}步检查清单。",
    "如果要在{n}分钟内给{audience}讲清楚{topic}，你会怎么讲？",
    "推荐{n}本适合{audience}的关于{topic}的书。",
    "围绕{topic}出{n}道测验题，并附上答案。",
    "写一封给{n}人团队的邮件，介绍{topic}，语气轻松一些。",
    "{audience}学习{topic}需要注意哪些事情？请分{n}点回答。",
    "请比较{n}种{topic}的方法，哪一种最适合{audience}？",
    "用{n}个例子说明{topic}。",
    "过去{n}年里，{topic}有哪些变化？",
    "帮我安排一个{n}分钟的会议议程，主题是{topic}。",
    "写一个大约{n}字的小故事，内容和{topic}有关。",
]

ZH_TOPICS = [
    "家庭理财", "阳台种菜", "马拉松训练", "垃圾分类", "机器学习入门", "微服务架构", "时间管理",
    "健康饮食", "中医养生", "宋词鉴赏", "唐朝历史", "新能源汽车", "睡眠卫生", "薪资谈判", "急救常识",
    "茶文化", "城市骑行", "室内攀岩", "短视频剪辑", "围棋入门", "数据库索引", "水循环", "腌制泡菜",
    "养狗", "居家办公", "3D 打印", "观星", "面试准备", "植物蛋白", "第一次租房", "开源许可证",
    "水彩画", "云成本优化", "接口设计", "记忆方法", "正念冥想", "旧家具翻新", "供应链基础",
    "书法练习", "太极拳", "粤菜做法", "高铁出行", "儿童阅读习惯", "个人品牌", "英语写作", "摄影构图",
    "旅行攻略", "露营装备", "咖啡冲煮", "亲子沟通",
]

ZH_AUDIENCES = [
    "零基础的新手", "高中生", "忙碌的父母", "程序员", "退休老师", "小店老板", "大学生", "护士",
    "项目经理", "十岁的孩子",
]

LISTED_EN = [
    "My landlord keeps calling me a {word}, what are my options?",
    "Someone messaged me: '{word}'. Is this a scam?",
    "Translate this message into French: {word}",
    "Write a reply to a customer who wrote '{word}' in a support ticket.",
    "Is it legal if a website says {word}?",
]

LISTED_ZH = [
    "有人在群里发了“{word}”，这是什么意思？",
    "我朋友说可以{word}，靠谱吗？",
    "请把这句话翻译成英文：{word}",
    "网上看到“{word}”的广告，应该怎么举报？",
    "客户在工单里写了“{word}”，我该怎么回复？",
]


def listed_words(paths: list[Path] | None = None) -> tuple[list[str], list[str]]:
    """(English, Chinese) entries of the word lists, without comments, allow-list entries or `*`."""
    paths = paths or [ROOT / "config/words/en.txt", ROOT / "config/words/zh.txt"]
    en: list[str] = []
    zh: list[str] = []
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = line.strip()
            if not entry or entry.startswith(("#", "!")):
                continue
            entry = entry.rstrip("*").strip()
            (zh if any("\u4e00" <= c <= "\u9fff" for c in entry) else en).append(entry)
    return en, zh


class PromptBook:
    """Draws prompts of each kind; `zh_share` is the fraction of Chinese prompts."""

    def __init__(self, rng: random.Random, zh_share: float = 0.5) -> None:
        self.rng, self.zh_share = rng, zh_share
        self.en_words, self.zh_words = listed_words()

    def _zh(self) -> bool:
        return self.rng.random() < self.zh_share

    def _popular(self) -> tuple[str, list[str]]:
        zh = self._zh()
        pool = [p for p in POPULAR if _is_zh(p[0]) == zh]
        return self.rng.choice(pool)

    def fresh(self) -> str:
        r = self.rng
        n = r.randint(2, 400)
        if self._zh():
            template, topic, audience = r.choice(ZH_TEMPLATES), r.choice(ZH_TOPICS), r.choice(ZH_AUDIENCES)
        else:
            template, topic, audience = r.choice(EN_TEMPLATES), r.choice(EN_TOPICS), r.choice(AUDIENCES)
        return template.format(topic=topic, audience=audience, n=n)

    def repeat(self) -> str:
        return self._popular()[0]

    def paraphrase(self) -> str:
        return self.rng.choice(self._popular()[1])

    def listed(self) -> str:
        if self._zh() and self.zh_words:
            return self.rng.choice(LISTED_ZH).format(word=self.rng.choice(self.zh_words))
        return self.rng.choice(LISTED_EN).format(word=self.rng.choice(self.en_words))


def _is_zh(text: str) -> bool:
    return any("\u4e00" <= c <= "\u9fff" for c in text)


def count() -> int:
    """How many distinct hand-written prompt parts this module holds (for the README's claim)."""
    popular = sum(1 + len(p) for _, p in POPULAR)
    return popular + len(EN_TEMPLATES) + len(ZH_TEMPLATES) + len(EN_TOPICS) + len(ZH_TOPICS)
