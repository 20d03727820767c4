"""Word lists and tables for proxy.cache.verify (data only): numerals, dates, negation, polarity, stop words.

Kept apart so the rules stay readable; extend these lists, not the rules, to cover more phrasings.
"""

from __future__ import annotations

CN_DIGITS = dict(zip("零〇一二两三四五六七八九", (0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9), strict=True))
CN_UNITS = {"十": 10, "百": 100, "千": 1000, "万": 10_000, "亿": 100_000_000}
CN_NUM = "零〇一二两三四五六七八九十百千万亿"
WEEKDAY_CN = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "日": 7, "天": 7}

# Chinese rewrites, applied in order: words that contain a numeral or a negation character without
# being one are neutralized first (一下 and 一点 are framing words: ZH_FRAMING); then dates and times
# become markers.
ZH_NEUTRAL = (
    "十分 万一 一些 一样 一起 一定 一直 一般 一切 一点儿 一会 统一 唯一 之一 "
    "一致 一旦 一边 一共 三明治 不过 不错 不同 不仅 不断 不久 不少 不管 不如 差不多 "
    "对不起 了不起 不得不 别人 别的 特别 区别 分别 类别 性别 级别 识别 告别 个别 差别 "
    "鉴别 辨别 判别 离别 别墅 别名 别处 非常 是非 非洲 无论 无聊 无线 未来 莫名"
).split()
ZH_REWRITES: list[tuple[str, str]] = [
    (r"(这|本|下|上)?个?(?:星期|礼拜|周)([一二三四五六日天])", "WD"),
    (r"今天|今日|今晚|今早", "d:0"),
    (r"明天|明日|明晚|明早", "d:+1"),
    (r"后天", "d:+2"),
    (r"昨天|昨日|昨晚", "d:-1"),
    (r"前天", "d:-2"),
    (r"这周|本周|这个?星期|这个?礼拜", "w:0"),
    (r"下周|下个?星期|下个?礼拜", "w:+1"),
    (r"上周|上个?星期|上个?礼拜", "w:-1"),
    (r"今年", "y:0"),
    (r"明年", "y:+1"),
    (r"去年", "y:-1"),
    (r"本月|这个月", "mo:0"),
    (r"下个?月", "mo:+1"),
    (r"上个?月", "mo:-1"),
    (r"周末", "weekend"),
    (r"早上|早晨|清晨|上午", "t:morning"),
    (r"中午", "t:noon"),
    (r"下午", "t:afternoon"),
    (r"傍晚|晚上|夜里|夜间|夜晚|半夜|凌晨", "t:night"),
]
ZH_NEG_PATTERN = r"禁止|严禁|[不没沒别別非无無未莫勿甭]"
ZH_A_NOT_A_PATTERN = r"([\u4e00-\u9fff])[不没]\1"  # 是不是, 有没有, 可不可(以): questions, not negations

SMALL = "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"
EN_NUMBERS = {w: i for i, w in enumerate((SMALL + " seventeen eighteen nineteen").split()) if w != "_"} | {
    "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80,
    "ninety": 90, "hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9, "dozen": 12,
    "first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "half": 0.5, "twice": 2, "double": 2, "triple": 3,
}  # fmt: skip
MONTHS = "january february march april may june july august september october november december"
EN_MONTHS = {m: i + 1 for i, m in enumerate(MONTHS.split())}
EN_MONTHS |= {m[:3]: i for m, i in EN_MONTHS.items() if m != "may"} | {"sept": 9}
WEEKDAYS = "monday tuesday wednesday thursday friday saturday sunday"
EN_WEEKDAYS = {d: i + 1 for i, d in enumerate(WEEKDAYS.split())}
EN_DAYS = {"today": "d:0", "tonight": "d:0 t:night", "tomorrow": "d:+1", "yesterday": "d:-1"}
EN_TIMES = {
    "morning": "t:morning", "noon": "t:noon", "afternoon": "t:afternoon", "evening": "t:night",
    "night": "t:night", "midnight": "t:night", "am": "t:am", "pm": "t:pm", "weekend": "weekend",
    "weekends": "weekend",
}  # fmt: skip
EN_REL = {"this": "0", "next": "+1", "last": "-1", "past": "-1", "coming": "+1", "previous": "-1"}
EN_PERIODS = {"week": "w", "month": "mo", "year": "y", "weekend": "weekend"}
EN_NEG = {"not", "no", "never", "none", "nobody", "nothing", "nowhere", "neither", "nor", "without"}
EN_CONTRACTIONS = [
    (r"\bcan'?t\b|\bcannot\b", "can not"), (r"\bwon'?t\b", "will not"), (r"\bshan'?t\b", "shall not"),
    (r"\b(do|does|did|is|are|was|were|have|has|had|would|should|could|must|need)n'?t\b", r"\1 not"),
    (r"'s\b", ""), (r"'re\b", " are"), (r"'ve\b", " have"), (r"'ll\b", " will"), (r"'d\b", " would"),
    (r"'m\b", " am"),
]  # fmt: skip

# Words that frame a question rather than say what it is about; ignored by the substitution rule.
EN_STOP = set(
    """a an the of to in on at by for from with about into onto over under as and or but if so than then
    is are was were be been being am do does did doing done have has had having can could would should will
    shall may might must i me my mine you your yours we our us he him his she her it its they them their
    what which who whom whose when where why how whats hows there here this that these those some any
    please tell explain show give let know find out get way ways method reason best good proper right
    correct exactly actually just really also very much many kind type thing things like help want need
    make makes define meaning mean means anyone someone tips idea ideas typical typically usually
    generally simply simple terms""".split()
)
ZH_FRAMING = (
    "为什么 怎么样 怎么 怎样 如何 什么 哪些 哪个 哪里 哪儿 哪位 哪种 多少 可以 能够 应该 应当 需要 请问 是否 "
    "一下 一点 有没有 是不是 能不能 可不可以 会不会 要不要"
).split()
ZH_STOP = set(
    "的了吗呢吧啊呀嘛么是我你他她它们这那很都也还就会把被给在和跟与及或有个些啥谁哪几请能可以要该应得着过"
)

# Opposite directions: when both turns use the same axis, they must point the same way.
POLAR_EN = {
    "increase": ("inc", 1), "decrease": ("inc", -1), "reduce": ("inc", -1), "raise": ("inc", 1),
    "buy": ("buy", 1), "sell": ("buy", -1), "purchase": ("buy", 1), "before": ("time", -1),
    "after": ("time", 1), "maximum": ("max", 1), "minimum": ("max", -1), "max": ("max", 1),
    "min": ("max", -1), "highest": ("max", 1), "lowest": ("max", -1), "largest": ("big", 1),
    "biggest": ("big", 1), "smallest": ("big", -1), "most": ("most", 1), "least": ("most", -1),
    "more": ("more", 1), "less": ("more", -1), "fewer": ("more", -1), "upload": ("load", 1),
    "download": ("load", -1), "import": ("port", 1), "export": ("port", -1), "enable": ("able", 1),
    "disable": ("able", -1), "encrypt": ("crypt", 1), "decrypt": ("crypt", -1), "install": ("inst", 1),
    "uninstall": ("inst", -1), "open": ("open", 1), "close": ("open", -1), "closed": ("open", -1),
    "high": ("high", 1), "low": ("high", -1), "gain": ("gain", 1), "lose": ("gain", -1),
    "pros": ("pro", 1), "cons": ("pro", -1), "advantages": ("pro", 1), "disadvantages": ("pro", -1),
    "cheap": ("cost", -1), "cheaper": ("cost", -1), "expensive": ("cost", 1), "hot": ("heat", 1),
    "cold": ("heat", -1), "fast": ("speed", 1), "quickly": ("speed", 1), "slow": ("speed", -1),
    "slowly": ("speed", -1), "faster": ("speed", 1), "slower": ("speed", -1), "better": ("good", 1),
    "worse": ("good", -1), "worst": ("good", -1), "start": ("run", 1), "stop": ("run", -1),
    "login": ("log", 1), "logout": ("log", -1), "allow": ("allow", 1), "block": ("allow", -1),
    "accept": ("accept", 1), "reject": ("accept", -1), "positive": ("sign", 1), "negative": ("sign", -1),
    "early": ("early", 1), "late": ("early", -1), "above": ("above", 1), "below": ("above", -1),
    "create": ("create", 1), "delete": ("create", -1), "remove": ("create", -1), "add": ("create", 1),
    "upgrade": ("grade", 1), "downgrade": ("grade", -1), "win": ("win", 1),
}  # fmt: skip
POLAR_ZH = {
    "上传": ("load", 1), "下载": ("load", -1), "增加": ("inc", 1), "减少": ("inc", -1), "提高": ("inc", 1),
    "降低": ("inc", -1), "上涨": ("inc", 1), "下跌": ("inc", -1), "上升": ("inc", 1), "下降": ("inc", -1),
    "涨": ("inc", 1), "跌": ("inc", -1), "买入": ("buy", 1), "卖出": ("buy", -1), "买": ("buy", 1),
    "卖": ("buy", -1), "之前": ("time", -1), "之后": ("time", 1), "以前": ("time", -1), "以后": ("time", 1),
    "最高": ("max", 1), "最低": ("max", -1), "最大": ("big", 1), "最小": ("big", -1), "最多": ("most", 1),
    "最少": ("most", -1), "开启": ("open", 1), "打开": ("open", 1), "关闭": ("open", -1), "开机": ("open", 1),
    "关机": ("open", -1), "加密": ("crypt", 1), "解密": ("crypt", -1), "安装": ("inst", 1),
    "卸载": ("inst", -1), "增重": ("gain", 1), "减重": ("gain", -1), "增肥": ("gain", 1),
    "减肥": ("gain", -1),
    "优点": ("pro", 1), "缺点": ("pro", -1), "好处": ("pro", 1), "坏处": ("pro", -1), "便宜": ("cost", -1),
    "昂贵": ("cost", 1), "导入": ("port", 1), "导出": ("port", -1), "登录": ("log", 1), "登出": ("log", -1),
    "升级": ("grade", 1), "降级": ("grade", -1), "加速": ("speed", 1), "减速": ("speed", -1),
    "创建": ("create", 1), "删除": ("create", -1), "新建": ("create", 1), "盈利": ("win", 1),
    "亏损": ("win", -1), "涨价": ("cost", 1), "降价": ("cost", -1), "入职": ("job", 1), "离职": ("job", -1),
}  # fmt: skip
POLAR_EN_PHRASES = [
    (r"\b(?:turn|switch|power)(?:s|ed|ing)?\s+on\b", ("open", 1)),
    (r"\b(?:turn|switch|power)(?:s|ed|ing)?\s+off\b", ("open", -1)),
    (r"\b(?:log|sign|check)(?:s|ged|ging|ed|ing)?\s+in(?:to)?\b", ("log", 1)),
    (r"\b(?:log|sign|check)(?:s|ged|ging|ed|ing)?\s+out\b", ("log", -1)),
]
# Words that give direction to the terms around them: swapping those terms changes the question.
CONNECT_EN = {"to", "from", "into", "onto", "toward", "towards", "than"}
CONNECT_ZH = set("到去往飞至比从转换兑")

# What a question asks for: the thing to produce (a story, a quiz, an agenda) or the kind of answer (a
# duration, a price, a place, a reason), and apart from it ("do:") the action asked about (apply,
# check, cancel). Two turns that both name a class of one dimension must share one. Patterns match
# the lower-cased (English) or NFKC (Chinese) turn; a deliverable that is also a common topic word
# ("the story of Hamlet", 变化 in 气候变化) is matched only next to a verb that asks for it, or the
# shared-class test stays lenient because the topic names the class on both sides.
ASK_EN_WORDS: dict[str, str] = {
    "explain": (  # what X is or means is what an explanation of X says
        "explain explains explained explanation teach describe define defined definition mean means meaning"
    ),
    "poem": "poem poems poetry haiku haikus limerick limericks sonnet sonnets lyrics",
    "summary": "summary summaries summarize summarise summarized summarised summarizing summarising tldr",
    "howto": "tip tips advice suggestions",
    "mistakes": "mistake mistakes pitfall pitfalls misconception misconceptions myth myths",
    "plan": "roadmap roadmaps itinerary itineraries timetable timetables",
    "agenda": "agenda agendas",
    "checklist": "checklist checklists",
    "quiz": "quiz quizzes flashcard flashcards",
    "books": "book books textbook textbooks resources",
    "email": "email emails letter letters memo memos newsletter newsletters",
    "compare": (
        "compare compares compared comparing comparison comparisons differ differs difference differences "
        "different versus vs distinguish distinguishes"
    ),
    "examples": "example examples illustrate illustrates illustration",
    "changes": "evolve evolves evolved evolution",
    "translate": "translate translates translated translating translation",
    "code": "code script snippet regex",
    "recipe": "recipe recipes",
    "duration": "duration",
    "price": "cost costs costing price prices priced pricing fee fees",
    "distance": "distance",
    "ticket": "ticket tickets",
    "reason": "reason reasons cause causes caused",
    # what is to be done to the thing asked about: a second dimension, compared on its own ("do:")
    "do:apply": "apply applying application request requesting",
    "do:check": "check checking track tracking view lookup",
    "do:cancel": "cancel cancels cancelled canceled cancelling canceling cancellation unsubscribe",
    "do:modify": "modify edit update updating change changing",
    "do:remove": "delete deleting remove removing erase",
    "do:pay": "pay paying payment payments",
    "do:reset": "reset resetting",
}
ASK_EN_PHRASES: dict[str, str] = {
    "explain": r"walk me through\b",
    "story": r"(?:write|tell|compose|invent|make up|create)\b[^.?!]*?\bstor(?:y|ies)\b",
    "plan": (
        r"(?:study|training|workout|meal|lesson|learning|action|business|marketing|travel|savings?"
        r"|diet|exercise|fitness|project|week|day|month|year)[- ]plans?\b"
        r"|schedules?\b(?!\s+(?:a|an|the|my|our|your|their)\b)"
    ),
    "checklist": r"check-lists?\b|to-?do lists?\b",
    "quiz": r"(?:exam|test|practice|trivia) questions\b|flash cards?\b",
    "ask-list": r"questions?\b[^.?!]*\bask\b",
    "books": r"reading lists?\b",
    "email": r"e-mails?\b",
    "changes": r"chang(?:e|ed|es)\b[^.?!]*\b(?:years?|decades?|centur(?:y|ies))\b",
    "pros-cons": r"pros and cons\b|advantages and disadvantages\b|benefits and drawbacks\b",
    "translate": r"how (?:do|would|can) (?:you|i) say\b",
    "duration": (
        r"how long\b|how much (?:time|rest|sleep)\b"
        r"|how many (?:seconds|minutes|hours|days|weeks|months|years|nights)\b"
    ),
    "amount": r"how (?:much|many)\b",
    "distance": r"how far\b",
    "howto": (  # "where can I find X" asks how to find it
        r"(?:how|where) (?:do|can|should|would|could) (?:i|you|we|one)\b|(?:how|where) to\b|way to\b"
        r"|steps to\b"
    ),
    "when": (
        r"when (?:is|are|was|were|do|does|did|will|should|can)\b|what time\b"
        r"|(?:what|which) (?:year|date|day)\b"
    ),
    "where": r"where (?:is|are|was|were)\b",
    "who": r"who (?:is|are|was|were|wrote|invented|discovered|painted|founded|made|created)\b",
    "reason": (
        r"why (?:is|are|was|were|do|does|did|can|should|would|will)\b"
        r"|what (?:causes|caused|makes|made)\b"
    ),
}
# the first word of a question, when it is one of these, says what is asked ("Why?", "Where to?")
ASK_EN_FIRST = {"when": "when", "who": "who", "why": "reason"}
# A yes/no question ("Can I return it after 30 days?", "退款会退到余额吗？") asks something else than
# how to do it; "Can you ... ?" and "能...吗" are requests, not yes/no questions.
ASK_EN_YESNO = (
    r"^\W*(?:(?:is|are|was|were|am|do|does|did|has|have|should|may|might)\b"
    r"|(?:can|could|will|would)\b(?!\s+you\b))"
)
ASK_ZH_YESNO = r"^(?!(?:你|您)?(?:能|可以|请|麻烦))(?:.*吗[？?！!。.\s]*$|.*([\u4e00-\u9fff])[不没]\1)"
ASK_ZH: dict[str, str] = {
    "explain": (  # 是什么 at the end of a bare "X是什么" (not "X的公式是什么": that asks for one thing of X)
        r"解释|讲清楚|讲明白|讲解|说明白|说清楚|科普|定义|什么意思|的意思|含义|是指"
        r"|^(?:请问)?什么是|^[^的]*是什么[？?。！!\s]*$"
    ),
    "story": r"(?:写|编|创作)[^，。？！,.?!]{0,8}故事|讲一个[^，。？！,.?!]{0,6}故事|小故事|童话",
    "poem": r"俳句|诗歌|首诗|写诗|作诗|绝句|律诗|对联|歌词",
    "summary": r"总结|概括|摘要|概述|归纳|梗概",
    "howto": (  # 在哪里查 (where to look it up) asks how to find it
        r"怎么(?!样|会)|如何|怎样|方法|办法|步骤|流程|建议|技巧|窍门|诀窍|小贴士|注意"
        r"|(?:哪里|哪儿|在哪)(?:能|可以)?(?:查|看|找|买|办|下载)"
    ),
    "mistakes": r"误区|常见错误|误解|踩坑",
    "plan": r"计划|规划|日程|行程|时间表|路线图",
    "agenda": r"议程",
    "checklist": r"清单|检查表|待办",
    "quiz": r"测验|测试题|考题|习题|练习题|选择题|试题",
    "books": r"书籍|书单|本书|的书|好书|教材|读物|入门书",
    "email": r"邮件|信件|求职信|推荐信|感谢信|辞职信|一封信",
    "compare": r"比较|对比|区别|差别|差异|不同|异同",
    "examples": r"例子|举例|实例|案例|示例",
    "changes": r"变化|演变|变迁|发展历程",
    "pros-cons": r"优缺点|利弊|优点和缺点|优劣|好处和坏处",
    "translate": r"翻译|译成|译为|用\w{1,3}[语文]怎么说",
    "code": r"代码|脚本|正则",
    "recipe": r"食谱|菜谱|配方",
    "duration": (
        r"多久|多长时间|多少时间|几个?(?:小时|钟头)|几分钟|几秒|几天|几周|几个?星期|几个月|几年"
        r"|多少个?(?:小时|分钟|天|年|月)"
    ),
    "price": r"多少钱|价格|价钱|费用|收费|票价|几块钱|花多少|贵不贵|售价|月费|年费",
    "distance": r"多远|距离|多少公里|几公里",
    "amount": r"多少|几[个只条块本次件位杯勺克斤]",
    "ticket": r"车票|机票|门票|高铁票|火车票|船票|票务",
    "when": r"什么时候|几点|哪一?年|哪一?天|何时|几月几号|几号|哪个季节|什么季节",
    "where": r"(?:哪里|哪儿|在哪)(?![里儿一个天年月]|(?:能|可以)?(?:查|看|找|买|办|下载))|什么地方|何处",
    "who": r"谁|哪位",
    "reason": r"为什么|为何|原因|怎么会|导致",
    "do:apply": r"申请|办理|开通",
    "do:check": r"查询|查看|查找|跟踪|追踪|哪里查|在哪查|查一下",
    "do:cancel": r"取消|退订|注销",
    "do:modify": r"修改|更改|更换|改成|改为",
    "do:remove": r"删除|删掉|移除|去掉",
    "do:pay": r"支付|付款|付费|缴费",
    "do:reset": r"重置",
}
